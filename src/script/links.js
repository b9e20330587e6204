// The click-time link decorator (see src/script.rs for what it does and why). Written compact by
// hand, since every byte is sent with the page: `script.rs` drops these comment lines and each
// line's indentation and joins the lines, so comments and layout cost nothing. Hence: a comment
// has a line of its own, every statement ends with `;` or `}`, and no string or regular
// expression spans two lines.
((w,d)=>{
  // The configuration, written in by script.rs (`config_object`).
  let C=KMI_CONFIG,
  // `s` percent-encoded: what encodeURIComponent encodes, and the characters matched by `r`.
  E=(s,r)=>encodeURIComponent(s).replace(r,escape),
  // `s` with its percent-escapes decoded once (throws where they are not UTF-8).
  D=s=>s.replace(/(%[\da-f]{2})+/gi,decodeURIComponent),
  // The first non-empty value of cookie `n`, without RFC 6265 quotes; the browser writes
  // `document.cookie` as `name=value` pairs joined by "; ".
  K=n=>{for(let p of d.cookie.split('; '))if(p.startsWith(n+'=')&&(p=p.slice(n.length+1).replace(/^"(.*)"$/,'$1')))return p},
  // `v` if it is a usable ID as the server judges one: not empty, at most 255 bytes of UTF-8,
  // no control characters.
  V=v=>v&&new Blob([v]).size<256&&!/[\0-\x1f\x7f-\x9f]/.test(v)&&v,
  // The visitor's ID now: none without consent or under Global Privacy Control; else KM.i()
  // when KM's library is loaded, else the first identity cookie with a value.
  I=()=>{try{let v;
    if(C.g&&navigator.globalPrivacyControl||C.k&&!(v=K(C.k))||C.t&&!D(v).includes(C.t))return;
    if(typeof(v=w.KM?.i?.())=='string'&&v)return V(v);
    for(let c of C.c)if(v=K(c))return V(D(v))
  }catch{}},
  // The host entry `[host, redirect, forms, paths]` of the partner whose site URL `u` is on.
  P=u=>{let h=u.hostname.replace(/\.$/,''),m=/^https?:$/.test(u.protocol)&&C.h.find(e=>e[0].test(h));return m&&m[3].test(u.pathname)&&m},
  // `s`, an absolute URL as the browser serializes it (`a.href`: no spaces, so none to write
  // as `+` in the redirect link), decorated for ID `v`: through the redirect path for a
  // redirect-mode partner; else with the parameter added after the query (`a` the URL up to the
  // query, `q` the query, `y` the fragment) or, under `existing = "replace"`, in place of the
  // first one (`f` counts them; later ones are dropped). Undefined where it stays as it is.
  H=(s,v)=>{let i=P(new URL(s)),[,a,q,y]=s.match(/([^?#]*)\??([^#]*)(.*)/),f=0,p;
    if(i&&i[1])return location.origin+C.r+E(s,/[!'()~]/g);
    if(i&&v){
      v=C.n+'='+E(v,/[!'()]/g).replaceAll('*','%2A');
      p=q.split('&').flatMap(z=>new URLSearchParams('&'+z).has(C.n)?f++?[]:v:z);
      if(!f)return a+'?'+q+(/[^&]$/.test(q)?'&':'')+v+y;
      if(C.x&&(p=a+'?'+p.join('&')+y)!=s)return p
    }
  },
  // Form `f` submitted by button `b` (or none): the button's `formaction` and `formmethod`
  // override the form's. On a partner with `forms`, a POST gets the parameter in its action,
  // anything else (GET) a hidden input unless the form has a field of that name.
  F=(f,b)=>{let[k,n]=b?.hasAttribute('formaction')?[b,'formaction']:[f,'action'],a=k.getAttribute(n),m=(b?.getAttribute('formmethod')??f.getAttribute('method'))?.toLowerCase(),u,v,h;
    if(!a?.trim()||m=='dialog')return;
    if(P(u=new URL(a,d.baseURI))?.[2]&&(v=I()))m=='post'?(h=H(u.href,v))&&k.setAttribute(n,h):f.querySelector('[name="'+C.n+'"]')||f.append(Object.assign(d.createElement('input'),{type:'hidden',name:C.n,value:v}))
  },
  // Every listened event: a submit is the form's; anything else decorates the first link with
  // an href on its composed path (into open shadow roots).
  G=e=>{try{let t=e.type,l,h;
    if(t=='submit')F(e.target,e.submitter);
    else if(t!='keydown'||e.key=='Enter')for(l of e.composedPath())if(/^A(REA)?$/.test(l.tagName)&&l.href){if(h=H(l.href,I()))l.href=h;break}
  }catch{}};
'mousedown auxclick keydown touchstart click submit'.split(' ').forEach(t=>w.addEventListener(t,G,!0));
w.KMIProxy={href:H,id:I}
})(window,document)
